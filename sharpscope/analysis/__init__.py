"""Analysis on plain arrays and stored results: trajectories on common steps (:mod:`.trajectories`), super
consistency (:mod:`.consistency`), the edge of stability (:mod:`.eos`), lr transfer (:mod:`.transfer`), long
tables (:mod:`.tables`), alignment exponents across widths (:mod:`.alignment`); runs grouped into comparisons
with verdicts (:mod:`.comparisons`), figures (:mod:`.plots`) and the report (:mod:`.report`)."""
