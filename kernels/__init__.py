"""Triton kernels of attnmem, one op a module. Importing a module here imports triton."""
