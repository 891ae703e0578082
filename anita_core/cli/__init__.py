"""Command-line helpers shared by the trainers, eval.py and chat.py: flag types,
the flags they have in common (threads, tokenizer, dtype, output folder), one-line
errors, and the environment variables the product reads. Nothing here imports the
trainer; the recipes' own flags live in anita_core.recipes.cli_*."""
