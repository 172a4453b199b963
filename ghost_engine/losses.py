"""Per-sample losses, target counts and model outputs under the Hugging Face conventions the engine undoes."""
import torch
from torch.nn import functional as F

IGNORE_INDEX = -100
TASKS = ("causal_lm", "classification", "token_classification")


def target_mask(labels: torch.Tensor, task: str, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Which targets count in the loss: [R, T-1] for a causal LM (labels shifted inside the model), [R, T] for
    token classification (a label per token), [R] for classification."""
    if task == "causal_lm":
        return labels[:, 1:] != ignore_index
    return labels != ignore_index


def target_counts(labels: torch.Tensor, task: str, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Number of targets of each row: n_i."""
    mask = target_mask(labels, task, ignore_index)
    return mask.reshape(mask.shape[0], -1).sum(1)


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor, task: str = "causal_lm",
                    ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean cross-entropy of each row ([R]; 0 for a row without targets), in float32, or in float64 for float64
    logits (a float64 model's validation loss stays float64: the deferred estimators differentiate it).

    causal_lm: logits [R, T, V] and unshifted labels [R, T] (token t predicts label t+1);
    token_classification: logits [R, T, C] and labels [R, T] (token t predicts label t);
    classification: logits [R, C], labels [R].
    """
    if task == "causal_lm":
        logits, labels = logits[:, :-1], labels[:, 1:]
    rows = labels.shape[0]
    flat = logits.reshape(-1, logits.shape[-1])
    losses = F.cross_entropy(flat if flat.dtype == torch.float64 else flat.float(), labels.reshape(-1),
                             ignore_index=ignore_index, reduction="none").reshape(rows, -1)
    counts = (labels.reshape(rows, -1) != ignore_index).sum(1)
    return losses.sum(1) / counts.clamp(min=1)


def output_field(output, name):
    """``output.name`` or ``output[name]`` of a model output (ModelOutput, dict, object), else None."""
    if isinstance(output, dict):
        return output.get(name)
    return getattr(output, name, None)
