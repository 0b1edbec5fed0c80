"""`evaluate browse`: a static, offline feature browser of trained SAEs.

collect.py streams each SAE's encoder once over chosen store rows and keeps, per feature, its top
contexts, a uniform sample of its firing contexts, its firing counts per topic and an activation histogram
(RAM bounded by features x kept contexts, not by rows). logits.py computes each decoder direction's logit
effect, nearest features and best match in another run. site.py writes index.html, the script and one data
file per dictionary (loaded by <script> tags: no server, no fetch, nothing from the network). build.py
checks the inputs and ties them together.
"""
