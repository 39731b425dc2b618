"""attnmem inside other libraries: `attnmem.integrations.transformers` registers attnmem as
an attention implementation of Hugging Face transformers."""
