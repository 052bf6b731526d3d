"""Network slimming of Ultralytics YOLO through Ultralytics' own trainer and validator
(``pip install 'netslim[yolo]'``; the core never imports this package): reading and writing
``.pt`` files without running their code (:mod:`.files`), the settings and data sets passed
to Ultralytics checked first (:mod:`.settings`, :mod:`.data`), sparsity training and
fine-tuning (:mod:`.train`), pruning measured in mAP (:mod:`.prune`), and the lab
(:mod:`.lab`, its folder :mod:`.folder`, its report :mod:`.report`)."""

from netslim.models.yolo_yaml import offline_ultralytics

# Before any module of this package imports Ultralytics: no downloads, no online checks,
# Ultralytics' restricted loading on.
offline_ultralytics()
