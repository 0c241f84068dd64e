% rebase('layout', title=platform.get('name', 'Service Gateway'), subtitle=platform.get('synopsis', ''), refresh=15)
% for name, service in services.items():
%   figure = figures[name]
<section class="card" id="{{name}}">
  <h2>{{service.info.get('name', name)}} <span class="muted">· {{name}} {{service.version}}</span></h2>
  <p class="muted">{{service.info.get('synopsis', '')}}</p>
  <ul class="figures">
    <li><b>{{figure.queued}}</b><span>queued</span></li>
    <li><b>{{figure.running}}</b><span>running</span></li>
    <li><b>{{figure.workers}}</b><span>workers ({{figure.busy}} busy)</span></li>
    <li><b>{{invocations.get(name, 0)}}</b><span>invocations</span></li>
  </ul>
  <nav class="links">
    <a href="{{base}}{{name}}/info">info</a><a href="{{base}}{{name}}/stats">stats</a>
%   for page in pages:
    <a href="{{base}}{{name}}/{{page}}">{{page}}</a>
%   end
  </nav>
</section>
% end
<p class="muted">Figures as of {{now}}; this page refreshes every 15 seconds.</p>
<section class="card">
  <h2>The gateway</h2>
  <p class="muted">Version {{platform.get('version', '')}}, {{platform.get('institution', '')}}.
  Submit with <code>POST /&lt;service&gt;/annotate</code>, follow with <code>GET /&lt;service&gt;/status?uuid=</code>.</p>
  <nav class="links">
    <a href="{{base}}info">info</a><a href="{{base}}stats">stats</a>
% for page in pages:
    <a href="{{base}}{{page}}">{{page}}</a>
% end
    <a href="{{base}}metrics">metrics</a><a href="{{base}}openapi.json">OpenAPI</a>
  </nav>
</section>
