"""Running a camrt file with onnxruntime: the session (`session`), the subgraphs cut from the file
for each fetch set and each layer's tail (`subgraphs`), further passes for methods that need them
(`context`) and the heatmap graph appended for in-session postprocessing (`heatmap_graph`)."""
