"""The small-scale study (PAPER.md §5): does training with stochastic depth make ViTs block-recurrent?"""
