"""Sequential recommendation: Taobao-style behaviour logs, next-item models, training, evaluation."""
