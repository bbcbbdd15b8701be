"""Safety on what the model says: filters, watermark, uncertainty and an audit log.

Built so far: `audit`, the hash-chained JSONL audit log the server writes (`tisslm serve
--audit-log`) and `tisslm audit verify` checks (`commands`).
"""
