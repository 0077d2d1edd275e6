"""PPO and GRPO: the math, rewards, experience making and the loop of the RLHF stage."""
