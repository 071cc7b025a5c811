"""The paper's StyleGAN2-ADA training configurations (Tables 3 and 7); see README.md."""
