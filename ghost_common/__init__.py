"""ghost_common: the bottom of the project's packages, standard library only (no torch, no numpy).

    ghost_common.durable   write_atomically (temporary file, fsync, rename), fsync_directory, FileLock, NO_SPACE
    ghost_common.flags     FlagParser: one flag style for every command line of the project

Every other package may import it; it imports none of them (docs/ARCHITECTURE.md).
"""
