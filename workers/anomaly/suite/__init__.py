"""A procedural benchmark for the anomaly stage that does not let a recipe tune to one surface.

Eight surface families rendered from code (woven, knitted, loop-pile carpet, brushed
metal, flat-sawn wood, granular, printed pattern, smooth coated) plus scikit-image's
photographed textures; each crop gets camera nuisance (phase, rotation, gain, light
gradient, vignetting, colour cast, blur, sensor noise) and defective crops get one
family-appropriate defect with a pixel mask. ``python -m workers.anomaly.suite`` runs it.

Modules: :mod:`.canvas` (noise and drawing helpers), :mod:`.surfaces` (the families),
:mod:`.flaws` (defects drawn on a finished surface), :mod:`.camera` (nuisance),
:mod:`.dataset` (fit / held-out / test splits with masks), :mod:`.__main__` (the run).
"""
