"""Images in and out: header sniffing before any decoding (`headers`), decoding to RGB8 (`decode`),
turning images into the model input (`preprocess`) and writing heatmaps and overlays (`render`)."""
