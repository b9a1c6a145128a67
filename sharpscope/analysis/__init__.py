"""Analysis: super consistency and lr transfer on plain arrays (:mod:`.consistency`), runs grouped into
comparisons with verdicts (:mod:`.comparisons`), figures (:mod:`.plots`) and the report (:mod:`.report`)."""
