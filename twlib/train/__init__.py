"""The trainers' machinery: training data (`data`), where the loop runs (`runs`: one process or one FSDP2
rank). The loops themselves are `twlib.train.sft` and `twlib.train.pgrpo`."""
