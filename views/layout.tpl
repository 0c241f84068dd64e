<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{title}}</title>
% if defined('refresh'):
<meta http-equiv="refresh" content="{{refresh}}">
% end
<style>
  :root { --ink: #1d2430; --muted: #5b6576; --line: #dfe3ea; --accent: #1f6feb; --paper: #f6f8fb; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 16px/1.55 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--ink); background: var(--paper); }
  header { background: var(--ink); color: #fff; padding: 1.4rem 2rem; }
  header h1 { margin: 0; font-size: 1.6rem; font-weight: 600; }
  header p { margin: .3rem 0 0; color: #c9d1dc; }
  main { max-width: 68rem; margin: 0 auto; padding: 1.5rem 2rem 3rem; }
  a { color: var(--accent); text-decoration: none; }
  a:hover { text-decoration: underline; }
  .card { background: #fff; border: 1px solid var(--line); border-radius: 10px; padding: 1.2rem 1.4rem; margin: 0 0 1.2rem; }
  .card h2 { margin: 0 0 .2rem; font-size: 1.25rem; }
  .muted { color: var(--muted); }
  .figures { display: flex; flex-wrap: wrap; gap: .8rem; margin: 1rem 0; padding: 0; list-style: none; }
  .figures li { flex: 1 1 7rem; background: var(--paper); border-radius: 8px; padding: .6rem .8rem; }
  .figures b { display: block; font-size: 1.5rem; font-variant-numeric: tabular-nums; }
  .figures span { color: var(--muted); font-size: .85rem; }
  .links { display: flex; flex-wrap: wrap; gap: .4rem 1rem; font-size: .9rem; }
  table { border-collapse: collapse; width: 100%; background: #fff; }
  th, td { text-align: left; padding: .45rem .7rem; border-bottom: 1px solid var(--line); vertical-align: top; }
  th { width: 14rem; color: var(--muted); font-weight: 500; }
  code, pre { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: .9em; }
  pre { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: .8rem 1rem; overflow-x: auto; }
  footer { color: var(--muted); font-size: .85rem; margin-top: 2rem; }
</style>
</head>
<body>
<header><h1>{{title}}</h1>
% if defined('subtitle'):
<p>{{subtitle}}</p>
% end
</header>
<main>
{{!base}}
</main>
</body>
</html>
