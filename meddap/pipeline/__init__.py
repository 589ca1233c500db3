"""The whole MEDDAP protocol as one resumable command (`meddap run CONFIG`, `meddap demo`).

    config.py     the TOML run config: each section fills the run config of its stage's command
    stages.py     a stage's folder, its stage.json and the hashes that decide skip / resume / redo
    run.py        the stages in order (data, split, then per fold: lora, expand, check, fid,
                  classify, gradcam), each calling the function its command calls; tables
    report.py     OUT/report.md: grids, the loss curve, FID/KID, tables, the check, Grad-CAM
    commands.py   `meddap run` and `meddap demo`
    configs/      the shipped configs: busi-sd14 (the paper's protocol), demo, demo-fast
"""
