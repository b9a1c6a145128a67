"""Runs: the HDF5 file formats (:mod:`.store` for run files, :mod:`.spectra` for results), capture in a
training loop (:mod:`.capture`, :mod:`.callbacks`), rebuilding a run's model (:mod:`.rebuild`) and the
offline spectrum jobs (:mod:`.jobs`) with their executors (:mod:`.executors`); what every writer shares: one
lock helper (:mod:`.locks`), disk reservations (:mod:`.space`) and moving aside instead of deleting
(:mod:`.superseded`)."""
