"""Hooks for a user's own Megatron-LM ``pretrain()`` script
(``examples/megatron_lm/pretrain_pwdpo.py``)."""
