"""sdt inside other training stacks, one small module each, imported only by those who use them:

* :mod:`sdt.integrations.trainer`: the SDT phases in a Hugging Face ``transformers.Trainer`` or any subclass of it,
  TRL's ``SFTTrainer`` included (``pip install 'sdtune[hf]'``).
"""
