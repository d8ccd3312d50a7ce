"""Reading a camrt file: its metadata and contract (`metadata`, over the protobuf scanner `wire`),
its graph without copying the weights (`slicing`), the checks that run before onnxruntime sees it
(`checks`) and the layers it can explain (`layers`). Nothing here runs the model."""
