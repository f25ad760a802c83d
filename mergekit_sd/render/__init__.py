"""Few-step renders of candidates on a fixed prompt grid, contact sheets and A/B sheets.

  layout      a checkpoint as a pipeline sees it: family, key maps to diffusers parameters
  configs     component configs derived from the checkpoint's shapes
  tiny_fit    the few module rebuilds the tiny test checkpoints need
  assets      tokenizers (local folder, Hugging Face cache, shipped tiny one), scheduler configs
  components  a family's models built empty from those configs
  weights     empty construction, and copying weights in place through the key map
  pipelines   one diffusers pipeline per architecture: build, swap, keep a LoRA fused
  presets     few-step samplers (LCM, Lightning, Turbo, Hyper-SD, schnell) and `standard`
  grids       prompt grid YAML files
  candidates  files, catalog references and recipe outputs (merged in memory)
  generate    batches of (prompt, seed) with the same noise for every candidate
  runner      a whole render: images, manifest, contact sheet
  estimate    how long the rest of a render takes, from its first batch (one line)
  compare     two candidates side by side, difference heat maps
  outputs, sheets, manifest, html   what is written
  folder      the output folder: only a render's own files replaced, created once inputs pass
"""
