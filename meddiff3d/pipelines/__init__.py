"""Pipelines: the plain Python calls bundle configs name (training the latent diffusion model, generation, data).

* :mod:`.latents` -- a datalist encoded once by a codec, cached;
* :mod:`.training` -- :func:`~.training.train_latent_diffusion`;
* :mod:`.generation` -- :func:`~.generation.generate` (NIfTI + preview + sidecar);
* :mod:`.data` -- datalists for the bundles (the synthetic cohort, written once);
* :mod:`.seg_training` -- :func:`~.seg_training.train_segmentation_diffusion` (PatchDDM patches, BraTS regions);
* :mod:`.segmentation` -- :func:`~.segmentation.segment` (ensembles -> labels, probability, uncertainty on the input
  grid);
* :mod:`.inferers` -- MONAI inferers over :func:`meddiff3d.diffusion.sample` (latent generation, segmentation
  ensembles): the bundles' ``inferer``;
* :mod:`.components` -- the other MONAI components of the inference configs (model files, ``network``, datasets,
  postprocessing, TorchScript exports of the decoder and the segmentation U-Net); the evaluators live beside their
  pipeline (``GenerationEvaluator``, ``SegmentationEvaluator``, ``AnomalyEvaluator``);
* :mod:`.commands` -- the same calls for ``python -m monai.bundle run``: a user error ends the process with one line
  and exit status 2 instead of a MONAI traceback.
"""
