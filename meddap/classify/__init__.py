"""Downstream classifiers of MEDDAP (section 4, Tables 1-3, Figs. 1a and 2).

    networks.py  the architecture table (ResNet34 / SqueezeNet1.1 / DenseNet121), k-class heads,
                 the shared init.pt
    train.py     the training loop (authors' defaults), resumable
    evaluate.py  scoring on a labelled dataset, cross-dataset by class name
    metrics.py   accuracy, one-vs-rest sensitivity/specificity/precision, macro F1, bootstrap CIs
    stats.py     mean ± std, paired and Nadeau-Bengio corrected t-tests, Holm
    gradcam.py   Grad-CAM hooks and overlays (Fig. 2)
    cells.py     result cells (`run_cell`): one trained network and its scores, as JSON
    tables.py    Tables 1-3 / Fig. 1a from the cells (charts drawn by meddap.figures)
"""
