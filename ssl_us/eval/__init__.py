"""Downstream evaluation of pretrained encoders (entry point: ``python -m ssl_us.finetune``).

- metrics: confusion matrix, accuracy, sensitivity, specificity, macro P/R/F1, ROC AUC,
  video-level aggregation, segmentation GAA/MA/mIoU, mean and std summaries.
- splits: patient-grouped stratified k-fold and named splits, label fractions by patient.
- protocols: linear probe, last-k blocks, full fine-tuning, fully supervised, random features.
- retrieval: view-retrieval pairs across exams, NCC, pair classifier, supervised siamese.
- saliency: occlusion maps, top-pixel boxes, weighted IoU.
- segmentation: U-Net decoder on an encoder's own block outputs.
- embeddings: kNN accuracy and t-SNE of frozen features.
- data, plots, report: inputs in memory, PNG figures, CSV and markdown tables.
"""
