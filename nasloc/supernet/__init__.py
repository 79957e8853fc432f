"""The weight-sharing supernet (:mod:`.supernet`), its training by the sandwich rule (:mod:`.train`), the proxy
accuracy of an arch with its weights (:mod:`.proxy`) and the check of how well that proxy ranks archs
(:mod:`.ranking_check`)."""
