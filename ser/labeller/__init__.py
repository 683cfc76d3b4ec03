"""`ser label` and the labelling below it, one job a module, bottom to top:

settings (defined once) -> reading (inputs, one file's windows and features) -> workers (process
tuning) -> stream (the feature workers) -> speakers (grouping and statistics) -> scoring
(windows through the trained model, adapted per group) -> loop (rows per file and window) ->
output (tables, safe paths, writing) -> cluster (the same on Dask workers) -> cli (the command).
"""
