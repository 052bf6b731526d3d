"""Network slimming of Ultralytics YOLO through Ultralytics' own trainer and validator
(``pip install 'netslim[yolo]'``; the core never imports this package): reading and writing
``.pt`` files without running their code (:mod:`.files`), sparsity training and fine-tuning
(:mod:`.train`), pruning measured in mAP (:mod:`.prune`), and the lab (:mod:`.lab`, its
folder :mod:`.folder`, its report :mod:`.report`)."""
