"""RS-IMLE (Vashist et al. 2024) with an RTM mapper: the IMLE regime of "One Pass Is Not Enough" (arXiv 2605.15309, §3.1, App. C)."""
