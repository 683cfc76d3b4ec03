"""Speech emotion recognition: audio and log-Mel features, corpora, the CNN, its training loop,
metrics, cross-validation, the batch labeller and the web page. The DVC stages in stages/ call
this library with their params; the library itself reads no params file."""
