"""The engine core: requests, the scheduler, the model runner, and the step that drives them."""
