"""The messages stage: every `message.requested` becomes a real e-mail or SMS
(rendered from a layout, handed to a provider), and what happens to it after
is reported as `delivery.status`. `render` holds the layouts and rendering,
`rules` the stage's decisions, `providers` the ways out."""
