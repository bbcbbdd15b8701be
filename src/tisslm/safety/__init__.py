"""Safety on what the model says: filters, watermark, uncertainty and an audit log."""
