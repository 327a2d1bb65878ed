"""Data of the ``mislabeled-sport`` task: the sport a term belongs to.

Every term is a real term of exactly one of the four sports (football is association
football), names none of them, and means nothing in the other three; terms that two of them
share ("volley", "lob", "baseline", "hook", "chip", "advantage", "ace", "US Open") are left out.
"""

from __future__ import annotations

SPORTS = ("football", "tennis", "basketball", "golf")

SPORT_TERMS: dict[str, tuple[str, ...]] = {
    "football": ("offside", "penalty kick", "corner kick", "goal kick", "throw-in", "header",
                 "red card", "yellow card", "goalkeeper", "bicycle kick", "sliding tackle",
                 "own goal", "stoppage time", "penalty shootout", "clean sheet", "six-yard box",
                 "back-pass rule", "centre-back", "hat-trick", "direct free kick", "false nine",
                 "through ball", "Panenka", "Golden Boot", "Ballon d'Or"),
    "tennis": ("deuce", "tiebreak", "love game", "double fault", "break point", "match point",
               "set point", "backhand", "forehand", "drop shot", "overhead smash", "second serve",
               "foot fault", "clay court", "grass court", "serve and volley", "passing shot",
               "topspin lob", "net cord", "ad court", "moonball", "racquet", "Davis Cup",
               "Wimbledon", "Roland Garros"),
    "basketball": ("slam dunk", "free throw", "three-pointer", "layup", "alley-oop", "jump shot",
                   "shot clock", "travelling", "double dribble", "jump ball", "pick and roll",
                   "triple-double", "buzzer beater", "backboard", "full-court press",
                   "point guard", "power forward", "sixth man", "technical foul",
                   "three-second violation", "goaltending", "bounce pass", "tip-off", "air ball",
                   "flagrant foul"),
    "golf": ("birdie", "bogey", "eagle", "albatross", "hole in one", "fairway", "putting green",
             "sand trap", "tee shot", "caddie", "mulligan", "stroke play", "Ryder Cup",
             "driving range", "putter", "sand wedge", "nine iron", "dogleg", "divot", "back nine",
             "water hazard", "green jacket", "three-wood", "links course", "flagstick"),
}

# The question of a sample, drawn per sample; {choices} lists the four sports.
SPORT_TEMPLATES = (
    'Which sport does the term "{term}" come from: {choices}?',
    'In which sport would a commentator say "{term}"? Answer {choices}.',
    '"{term}" is a term from which sport: {choices}?',
)
