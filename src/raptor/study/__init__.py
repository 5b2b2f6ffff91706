"""The small-scale study (docs/method.md §8): does training with stochastic depth make ViTs block-recurrent?"""
