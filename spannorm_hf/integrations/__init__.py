"""What the model meets after pretraining: LoRA fine-tuning with PEFT (`finetune`), text generation
(`generation`), perplexity and lm-eval (`evaluation`), model cards and uploads to the Hub (`hub`)."""
