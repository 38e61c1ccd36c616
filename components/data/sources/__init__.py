"""Source readers for ingestion: a folder, tar and zip archives, the CIFAR-10 python
archive, S3. Each lists its entries (checked, nothing written) before giving bytes.
May import ``components.data.layout`` and config/errors only.
"""
