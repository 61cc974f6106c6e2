"""The tests' PostgreSQL server and driver work: an Optuna study stored through RDBStorage in a
real server (the `postgres_db_url` fixture, tests/postgres.py) is seen whole from a second storage."""

import optuna


def test_optuna_study_round_trips_through_postgres(postgres_db_url):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    writer = optuna.storages.RDBStorage(postgres_db_url)
    reader = None
    try:
        assert writer.engine.dialect.name == "postgresql"
        assert optuna.study.get_all_study_names(writer) == []  # each test gets an empty database

        study = optuna.create_study(study_name="fixture-check", storage=writer, direction="minimize",
                                    sampler=optuna.samplers.RandomSampler(seed=0))
        study.optimize(lambda trial: trial.suggest_float("x", -1.0, 1.0) ** 2, n_trials=3)

        reader = optuna.storages.RDBStorage(postgres_db_url)  # a second client, as another worker would be
        loaded = optuna.load_study(study_name="fixture-check", storage=reader)
        assert [t.state for t in loaded.trials] == [optuna.trial.TrialState.COMPLETE] * 3
        assert [t.params for t in loaded.trials] == [t.params for t in study.trials]
        assert [t.value for t in loaded.trials] == [t.params["x"] ** 2 for t in study.trials]
        assert loaded.best_value == min(t.value for t in study.trials)
    finally:
        for storage in (writer, reader):
            if storage is not None:
                storage.remove_session()
                storage.engine.dispose()
