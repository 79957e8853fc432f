"""From a run to a deployed model: export as a timm model folder (:mod:`.export`, :mod:`.onnx`), a run's
trials as models (:mod:`.trials`), latency on the user's device (:mod:`.latency`, :mod:`.latency_parts`,
:mod:`.timing`) and MACs as fvcore counts them (:mod:`.macs`)."""
