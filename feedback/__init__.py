"""The feedback store: prompts, answers, votes, preference pairs, export and the training job."""
