"""Data: demo corpus, download, preprocessing, manifests, fbank features and datasets."""
