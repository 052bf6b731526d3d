"""The experiments that chain training and pruning, each resumable in one folder: the lab
(:mod:`.experiment`, its folder layout :mod:`.folder`, its report :mod:`.report`), early
pruning (:mod:`.early`) and multi-pass slimming (:mod:`.multipass`), all built of the same
stages (:mod:`.stages`)."""
