"""Storage behind one small interface; ``s3`` is the only module that imports aiobotocore."""
