"""Phase two, in real time: open a pool, consolidate the queried experts with the library into one model, answer,
export (``.pt2``, ONNX), and serve it over HTTP."""
