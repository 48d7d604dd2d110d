"""fastdiff serve: the AUTOMATIC1111 HTTP API over a fastdiff Pipeline."""
