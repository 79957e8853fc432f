"""The selection: short trainings decide among the search's best candidates and the seed designs.
The candidates (:mod:`.candidates`), successive halving with its rungs and ties (:mod:`.halving`), the selection
study (:mod:`.study`), how a candidate trains (:mod:`.trainer`), several at a time (:mod:`.pool`) or under Ray
(:mod:`.ray`)."""
