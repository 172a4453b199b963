"""The estimators a GradDotProdEngine can save per sample (its ``value=``; docs/METHOD.md section 2.1), by name.

Plain names and no imports: command lines offer and check them (`--value`) before torch is imported.
"""

FIRST_ORDER, SECOND_ORDER, ADAMW, ADAMW_VT, MIDPOINT, COSINE = (
    "first_order", "second_order", "adamw", "adamw_vt", "midpoint", "cosine")
VALUES = (FIRST_ORDER, SECOND_ORDER, ADAMW, ADAMW_VT, MIDPOINT, COSINE)
# estimators whose validation-side vector needs the step's batch gradient g_B, known only after the last
# backward: the taps keep each layer's training rows and aggregate_and_log() projects them on that vector
DEFERRED = (SECOND_ORDER, ADAMW_VT, MIDPOINT)
LR_INSIDE = (SECOND_ORDER, ADAMW, ADAMW_VT, MIDPOINT)  # phi_i = w_i·dot_i (first_order: lr·w_i·dot_i)

# The app's and the integrations' default: the estimator that follows the optimizer (docs/FIDELITY.md): under
# Adam/AdamW "adamw" (same cost as first order, tracks the step's exact Shapley value from AdamW's third update
# on), under SGD and momentum "first_order". Resolved before the run starts; config.json and every file name
# the estimator it became.
AUTO = "auto"
CHOICES = (AUTO,) + VALUES


def value_for(value: str, adam: bool) -> str:
    """``value``, or for "auto" the estimator of an optimizer that is (``adam``) an Adam/AdamW or not."""
    if value != AUTO:
        return value
    return ADAMW if adam else FIRST_ORDER
