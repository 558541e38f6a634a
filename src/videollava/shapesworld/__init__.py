"""ShapesWorld: a synthetic image and video world whose every answer is known exactly.

- `world`: colours, shapes, priors and rules; `Scene` and random scenes within the rules
- `render`: a scene drawn to pixels and encoded as PNG, JPEG or H.264
- `text`: captions, questions and answers read off a scene; the POPE splits
- `twins`: scenes changed in one fact, for contrastive batches
- `generate`: a whole data set on disk (training and held-out sets, JSON files, media) and its command
- `evaluate`: every held-out question asked of a model and scored
"""
