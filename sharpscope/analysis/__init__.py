"""Analysis on plain arrays and stored results: trajectories on common steps (:mod:`.trajectories`), super
consistency (:mod:`.consistency`), the edge of stability (:mod:`.eos`), lr transfer (:mod:`.transfer`), long
tables (:mod:`.tables`), alignment exponents across widths (:mod:`.alignment`); the report in three steps:
runs read (:mod:`.summaries`) and grouped into comparisons with verdicts (:mod:`.comparisons`), figures
(:mod:`.figures` on the primitives of :mod:`.plots`), the page (:mod:`.page`, from :mod:`.findings` and
:mod:`.expectations`), run by :mod:`.report`."""
