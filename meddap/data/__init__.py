"""Data of MEDDAP: datasets, a phantom, splits, prompts and dataset expansion.

- `datasets`: BUSI, Dataset B and ImageFolder layouts; `resolve_images(spec)` for
  a folder or a split part `SPLIT.json:FOLD:PART`; masks, unreadable files.
- `phantom`, `anatomy`: a simulated breast-ultrasound dataset in BUSI
  layout (tissue layers, BI-RADS lesion shapes, speckle, TGC, log compression).
- `hashing`, `splits`: SHA-256 and perceptual-hash duplicate groups; stratified,
  leakage-safe k-fold split manifests.
- `prompts`: the paper's prompt template, the released code's, Table 1's adjectives.
- `expand`: the synthetic training sets per adjective and ratio (section 3.3).
- `commands`: `meddap dataset-info | split | leakage | phantom | expand`.
"""
