"""Training: the loop (:mod:`.loop`), evaluation (:mod:`.evaluate`), the run folder and its
lock (:mod:`.runfolder`, :mod:`.runlock`) and the decisions between epochs, λ auto and early
pruning (:mod:`.control`). The names a training script needs are here too."""

from netslim.train.evaluate import evaluate
from netslim.train.loop import fit, train_epoch
from netslim.train.runfolder import read_metrics

__all__ = ["evaluate", "fit", "read_metrics", "train_epoch"]
