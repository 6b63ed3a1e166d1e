"""Evaluation a safety researcher can cite: prompt suites (I2P, COCO captions, GenEval, attack CSVs),
resumable base vs base+adapter generation, NudeNet, Q16, I2P inappropriate rate, CLIP score, FID, the
steering reward and its alpha sweep, and a report (json, markdown, plots)."""
